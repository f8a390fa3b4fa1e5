-- Store a new queued job, index it and push its Celery message (store.AsyncJobStore.create_queued).
-- One script costs the API about half the client CPU of the same commands in a MULTI/EXEC
-- pipeline, whose every reply redis-py parses; the hash travels as one JSON object, since
-- redis-py packs each argument of a command at ~1 us apiece.
-- KEYS: the job hash, idx:all, idx:status:queued, idx:engine:<engine>, the engine's queue.
-- ARGV: Celery message, the hash's fields as a JSON object of strings (id, score and
-- expires_at_ms, the job's expiry in Unix ms, in it: its events' keys expire then too).
local job = cjson.decode(ARGV[2])
local fields = {}
for name, value in pairs(job) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIREAT', KEYS[1], job['expires_at_ms'])
for i = 2, 4 do redis.call('ZADD', KEYS[i], job['score'], job['id']) end
redis.call('LPUSH', KEYS[5], ARGV[1])
return 1
