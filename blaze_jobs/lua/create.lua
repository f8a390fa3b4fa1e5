-- Admit a new queued job, then store it, index it and push its Celery message
-- (store.AsyncJobStore.create_queued). One script costs the API about half the client CPU of
-- the same commands in a MULTI/EXEC pipeline, whose every reply redis-py parses; the hash
-- travels as one JSON object, since redis-py packs each argument of a command at ~1 us apiece.
-- KEYS: the job hash, the tenant's idx:all, idx:status:queued and idx:engine:<engine>, the
-- deployment's idx:status:queued, the engine's queue, the tenant's idx:status:running.
-- ARGV: Celery message, the hash's fields as a JSON object of strings (id, score and
-- expires_at_ms, the job's expiry in Unix ms, in it: its events' keys expire then too), the
-- key's quota of the tenant's jobs queued plus running (0: none), the queue's bound (0: none),
-- the score below which an index entry is older than a retention (its job has expired).
-- With an Idempotency-Key, KEYS[8] is its claim and ARGV[6] the value this create claimed it
-- with: a create whose claim was taken over (a retry took it as stale) stores nothing, so a
-- key never makes two jobs however late this create runs.
-- Returns 1 when stored; {-1, count} past the quota, {-2, length} past the queue's bound and
-- {-3, 0} for a claim taken over, with nothing written (admission before storage).
if KEYS[8] and redis.call('GET', KEYS[8]) ~= ARGV[6] then return {-3, 0} end
local quota = tonumber(ARGV[3])
if quota > 0 then
  local count = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[7])
  if count >= quota then
    -- Jobs that expired before they ran left their entries behind: only at the quota does it
    -- pay to drop them and count again.
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5])
    redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. ARGV[5])
    count = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[7])
    if count >= quota then return {-1, count} end
  end
end
local bound = tonumber(ARGV[4])
if bound > 0 then
  local length = redis.call('LLEN', KEYS[6])
  if length >= bound then return {-2, length} end
end
local job = cjson.decode(ARGV[2])
local fields = {}
for name, value in pairs(job) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIREAT', KEYS[1], job['expires_at_ms'])
for i = 2, 5 do redis.call('ZADD', KEYS[i], job['score'], job['id']) end
redis.call('LPUSH', KEYS[6], ARGV[1])
return 1
