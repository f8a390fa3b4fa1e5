-- Admit new queued jobs of one tenant, then store each, index it and push its Celery message
-- (store.AsyncJobStore.create_queued for one job, create_many for a batch file's). One script
-- costs the API about half the client CPU of the same commands in a MULTI/EXEC pipeline, whose
-- every reply redis-py parses, and redis-py packs each argument of a command at ~1 us apiece:
-- so the hashes travel as one JSON array, and a batch's index entries and messages go in a
-- few ZADDs and LPUSHes of many members. The jobs of one call are admitted together: a batch
-- file is taken whole or refused whole, never half-created.
-- KEYS: the tenant's idx:status:queued, idx:status:running and idx:all, the deployment's
-- idx:status:queued; then two per engine among the jobs: the tenant's idx:engine:<engine> and
-- the engine's queue; then each job's hash; then, with an Idempotency-Key, its claim.
-- ARGV: the key's quota of the tenant's jobs queued plus running (0: none), each queue's bound
-- (0: none), the score below which an index entry is older than a retention (its job has
-- expired), the value this create claimed its Idempotency-Key with ('' without one), the
-- number of engines, a JSON array of how many jobs of each engine to admit (this call's, or a
-- whole batch's on its first part), a JSON array of each job's engine (1 for the first pair
-- of keys), a JSON array of each job's hash fields (objects of strings: id, score and expires_at_ms, the job's
-- expiry in Unix ms, in it: its events' keys expire then too); then each job's Celery message.
-- A create whose claim was taken over (a retry took it as stale) stores nothing, so a key
-- never makes two jobs however late this create runs.
-- Returns 1 when stored; {-1, count} past the quota, {-2, length, queue} past a queue's bound
-- and {-3, 0} for a claim taken over, with nothing written (admission before storage).
local engines = tonumber(ARGV[5])
local jobs = #ARGV - 8
local first_job = 4 + 2 * engines
local claim = KEYS[first_job + jobs + 1]
if claim and redis.call('GET', claim) ~= ARGV[4] then return {-3, 0} end
local admit = cjson.decode(ARGV[6])
local admitted = 0
for e = 1, engines do admitted = admitted + admit[e] end
local quota = tonumber(ARGV[1])
if quota > 0 then
  local count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  if count + admitted > quota then
    -- Jobs that expired before they ran left their entries behind: only at the quota does it
    -- pay to drop them and count again.
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
    count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
    if count + admitted > quota then return {-1, count} end
  end
end
local bound = tonumber(ARGV[2])
if bound > 0 then
  for e = 1, engines do
    local queue = KEYS[4 + 2 * e]
    local length = redis.call('LLEN', queue)
    if length + admit[e] > bound then return {-2, length, queue} end
  end
end
local engine_of = cjson.decode(ARGV[7])
local records = cjson.decode(ARGV[8])
-- Index entries and messages go in parts, since a command's arguments are unpacked onto Lua's
-- stack; a part is even, so no part splits a (score, id) pair.
local PART = 1000
local entries, by_engine, messages = {}, {}, {}
local function flush(key, values, command)
  for i = 1, #values, PART do redis.call(command, key, unpack(values, i, math.min(i + PART - 1, #values))) end
end
for e = 1, engines do by_engine[e], messages[e] = {}, {} end
for i = 1, jobs do
  local job = records[i]
  local fields = {}
  for name, value in pairs(job) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  local key = KEYS[first_job + i]
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIREAT', key, job['expires_at_ms'])
  entries[#entries + 1] = job['score']
  entries[#entries + 1] = job['id']
  local engine = by_engine[engine_of[i]]
  engine[#engine + 1] = job['score']
  engine[#engine + 1] = job['id']
  local queued = messages[engine_of[i]]
  queued[#queued + 1] = ARGV[8 + i]
end
flush(KEYS[1], entries, 'ZADD')
flush(KEYS[3], entries, 'ZADD')
flush(KEYS[4], entries, 'ZADD')
for e = 1, engines do
  flush(KEYS[3 + 2 * e], by_engine[e], 'ZADD')
  flush(KEYS[4 + 2 * e], messages[e], 'LPUSH')
end
return 1
