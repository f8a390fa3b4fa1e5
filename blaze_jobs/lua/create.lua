-- Admit new queued jobs of one tenant, then store each, index it and push its Celery message
-- (store.AsyncJobStore.create_queued for one job, create_many for a batch file's). One script
-- costs the API about half the client CPU of the same commands in a MULTI/EXEC pipeline, whose
-- every reply redis-py parses; each hash travels as one JSON object, since redis-py packs each
-- argument of a command at ~1 us apiece. The jobs of one call are admitted together: a batch
-- file is taken whole or refused whole, never half-created.
-- KEYS: the tenant's idx:status:queued, idx:status:running and idx:all, the deployment's
-- idx:status:queued; then three per job: its hash, the tenant's idx:engine:<engine>, the
-- engine's queue; then, with an Idempotency-Key, its claim.
-- ARGV: the key's quota of the tenant's jobs queued plus running (0: none), each queue's bound
-- (0: none), the score below which an index entry is older than a retention (its job has
-- expired), the value this create claimed its Idempotency-Key with ('' without one); then two
-- per job: its Celery message and its hash's fields as a JSON object of strings (id, score and
-- expires_at_ms, the job's expiry in Unix ms, in it: its events' keys expire then too).
-- A create whose claim was taken over (a retry took it as stale) stores nothing, so a key
-- never makes two jobs however late this create runs.
-- Returns 1 when stored; {-1, count} past the quota, {-2, length, queue} past a queue's bound
-- and {-3, 0} for a claim taken over, with nothing written (admission before storage).
local jobs = (#ARGV - 4) / 2
local claim = KEYS[4 + 3 * jobs + 1]
if claim and redis.call('GET', claim) ~= ARGV[4] then return {-3, 0} end
local quota = tonumber(ARGV[1])
if quota > 0 then
  local count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  if count + jobs > quota then
    -- Jobs that expired before they ran left their entries behind: only at the quota does it
    -- pay to drop them and count again.
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
    count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
    if count + jobs > quota then return {-1, count} end
  end
end
local bound = tonumber(ARGV[2])
if bound > 0 then
  local wanted, order = {}, {}
  for i = 0, jobs - 1 do
    local queue = KEYS[4 + 3 * i + 3]
    if not wanted[queue] then order[#order + 1] = queue end
    wanted[queue] = (wanted[queue] or 0) + 1
  end
  for _, queue in ipairs(order) do
    local length = redis.call('LLEN', queue)
    if length + wanted[queue] > bound then return {-2, length, queue} end
  end
end
for i = 0, jobs - 1 do
  local key = KEYS[4 + 3 * i + 1]
  local job = cjson.decode(ARGV[4 + 2 * i + 2])
  local fields = {}
  for name, value in pairs(job) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIREAT', key, job['expires_at_ms'])
  redis.call('ZADD', KEYS[1], job['score'], job['id'])
  redis.call('ZADD', KEYS[3], job['score'], job['id'])
  redis.call('ZADD', KEYS[4], job['score'], job['id'])
  redis.call('ZADD', KEYS[4 + 3 * i + 2], job['score'], job['id'])
  redis.call('LPUSH', KEYS[4 + 3 * i + 3], ARGV[4 + 2 * i + 1])
end
return 1
