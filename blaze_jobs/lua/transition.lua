--#include events
-- Move a job between statuses, atomically, with what goes with the move (store.JobStore.transition).
-- KEYS[1..5] the job's event keys (events.lua), KEYS[6] its lease, KEYS[7..11] the status
-- indexes in JobStatus order, KEYS[12] the queue to push onto (when pushing).
-- ARGV[1] a JSON spec:
--   from: statuses the job may be in; to: the new status; attempt: count a start;
--   fields: hash fields to set; attempts: only if the attempt count is this (a stale worker
--   cannot finish a job that was handed to another); lease: {owner, ms, numbered} to take
--   (numbered: the owner is suffixed with ':<attempts>' after the count), or release: {owner}
--   to drop the lease only if it is still this owner's (a stale attempt must not drop the
--   lease of the attempt that replaced it); unleased: move only if the lease is gone (its
--   worker died); push: {message, back} to RPUSH (with back: LPUSH) onto KEYS[12] in the
--   same step, so a requeued job can never be left without a message; streamed: a running
--   text job's output becomes the text it streamed (a cancel); read: also return the job's
--   fields after the move.
-- ARGV[2] the webhook task's message template (broker.webhook_task_template).
-- A change of status is also appended to the job's event stream, with the webhook delivery
-- it calls for. Returns {1, old status} (with read: {1, old status, HGETALL}) when moved,
-- {0, current status} when not, {-1} when no such job.
local STATUS_INDEX = {queued = KEYS[7], running = KEYS[8], succeeded = KEYS[9], failed = KEYS[10], canceled = KEYS[11]}
local k = blaze_event_keys(ARGV[2])
local spec = cjson.decode(ARGV[1])
local current = redis.call('HGET', k.job, 'status')
if not current then return {-1} end
local allowed = false
for _, status in ipairs(spec['from']) do if status == current then allowed = true end end
if not allowed then return {0, current} end
if spec['attempts'] and redis.call('HGET', k.job, 'attempts') ~= spec['attempts'] then return {0, current} end
if spec['unleased'] and redis.call('EXISTS', KEYS[6]) == 1 then return {0, current} end
local args = {'status', spec['to']}
for name, value in pairs(spec['fields'] or {}) do args[#args + 1] = name; args[#args + 1] = value end
redis.call('HSET', k.job, unpack(args))
if spec['attempt'] then redis.call('HINCRBY', k.job, 'attempts', 1) end
if spec['lease'] then
  local owner = spec['lease']['owner']
  if spec['lease']['numbered'] then owner = owner .. ':' .. redis.call('HGET', k.job, 'attempts') end
  redis.call('SET', KEYS[6], owner, 'PX', spec['lease']['ms'])
end
if spec['release'] and redis.call('GET', KEYS[6]) == spec['release']['owner'] then
  redis.call('DEL', KEYS[6])
end
if spec['push'] then
  -- kombu pops from the right: back=true queues the job behind every job waiting (LPUSH)
  redis.call(spec['push']['back'] and 'LPUSH' or 'RPUSH', KEYS[12], spec['push']['message'])
end
local id = redis.call('HGET', k.job, 'id')
if current ~= spec['to'] then
  local score = redis.call('HGET', k.job, 'score')
  redis.call('ZREM', STATUS_INDEX[current], id)
  redis.call('ZADD', STATUS_INDEX[spec['to']], score, id)
end
if spec['streamed'] and current == 'running' then blaze_streamed_output(k) end
if current ~= spec['to'] then blaze_status_event(k, id, spec['to']) end
if spec['read'] then return {1, current, redis.call('HGETALL', k.job)} end
return {1, current}
