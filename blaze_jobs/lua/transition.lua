--#include events
-- Move a job between statuses, atomically, with what goes with the move (store.JobStore.transition).
-- KEYS[1..5] the job's event keys (events.lua), KEYS[6] its lease, KEYS[7..8] the deployment's
-- queued and running indexes (the reaper's), KEYS[9..13] the job's tenant's status indexes in
-- JobStatus order, KEYS[14] the queue to push onto (when pushing).
-- ARGV[1] a JSON spec:
--   from: statuses the job may be in; to: the new status; attempt: count a start;
--   fields: hash fields to set; attempts: only if the attempt count is this (a stale worker
--   cannot finish a job that was handed to another); lease: {owner, ms, numbered} to take
--   (numbered: the owner is suffixed with ':<attempts>' after the count), or release: {owner,
--   ms} to drop the lease only if it is still this owner's (a stale attempt must not drop the
--   lease of the attempt that replaced it; ms: the lease period); unleased: move only if the lease is gone (its
--   worker died); push: {message, back} to RPUSH (with back: LPUSH) onto KEYS[14] in the
--   same step, so a requeued job can never be left without a message; streamed: a running
--   text job's output becomes the text it streamed (a cancel); read: also return the job's
--   fields after the move; ttl: the job's retention (job_ttl_s), which its events share;
--   owner: {tenant, legacy}: move only a job of this tenant (legacy: a job with no tenant
--   field, from before tenants, is this tenant's), else answer as for no such job.
-- ARGV[2] the webhook task's message template (broker.webhook_task_template).
-- A change of status is also appended to the job's event stream, with the webhook delivery
-- it calls for. Returns {1, old status} (with read: {1, old status, the fields}) when moved,
-- {0, current status} when not, {-1} when no such job.
--
-- The job is read once (HGETALL) and written once (HSET, with the event's id when there is
-- an event): the checks, the event's snapshot and `read` use that copy, kept up to date.
local LIVE_INDEX = {queued = KEYS[7], running = KEYS[8]}
local STATUS_INDEX = {queued = KEYS[9], running = KEYS[10], succeeded = KEYS[11], failed = KEYS[12], canceled = KEYS[13]}
local k = blaze_event_keys(ARGV[2])
local spec = cjson.decode(ARGV[1])
local rec = blaze_record(redis.call('HGETALL', k.job))
local current = rec['status']
if not current then return {-1} end
if spec['owner'] then
  local tenant = rec['tenant']
  if not (tenant == spec['owner'][1] or (tenant == nil and spec['owner'][2])) then return {-1} end
end
local allowed = false
for _, status in ipairs(spec['from']) do if status == current then allowed = true end end
if not allowed then return {0, current} end
if spec['attempts'] and rec['attempts'] ~= spec['attempts'] then return {0, current} end
if spec['unleased'] and redis.call('EXISTS', KEYS[6]) == 1 then return {0, current} end

-- The lease of the attempt the job runs holds '<worker>:<attempts>' of its hash: every write
-- of a lease (a take here, a renewal's re-creation in renew.lua) writes those two fields or
-- checks them in the same step, and a hand-back drops the lease as it changes the count. So
-- an end guarded by its attempt, naming the hash's worker, owns the lease if there is one.
-- (The attempts guard has checked rec's count already.)
local owned = spec['release'] and spec['attempts'] and spec['release']['owner'] == (rec['worker'] or '') .. ':' .. rec['attempts']

local changes = {status = spec['to']}
for name, value in pairs(spec['fields'] or {}) do changes[name] = value end
if spec['attempt'] then changes['attempts'] = tostring((tonumber(changes['attempts'] or rec['attempts']) or 0) + 1) end
if spec['streamed'] and current == 'running' then changes['output'] = blaze_streamed_output(k, rec) end
if current ~= spec['to'] then changes['progress'] = blaze_completed_progress(rec, spec['to']) end
for name, value in pairs(changes) do rec[name] = value end

if spec['lease'] then
  local owner = spec['lease']['owner']
  if spec['lease']['numbered'] then owner = owner .. ':' .. rec['attempts'] end
  redis.call('SET', KEYS[6], owner, 'PX', spec['lease']['ms'])
end
if owned then
  -- One command, not GET and DEL. A lease found to be another's all the same (written behind
  -- the job's back) is put back, for a whole lease period: it is never dropped.
  local held = redis.call('GETDEL', KEYS[6])
  if held and held ~= spec['release']['owner'] then redis.call('SET', KEYS[6], held, 'PX', spec['release']['ms'] or 60000) end
elseif spec['release'] and redis.call('GET', KEYS[6]) == spec['release']['owner'] then
  redis.call('DEL', KEYS[6])
end
if spec['push'] then
  -- kombu pops from the right: back=true queues the job behind every job waiting (LPUSH)
  redis.call(spec['push']['back'] and 'LPUSH' or 'RPUSH', KEYS[14], spec['push']['message'])
end
if current ~= spec['to'] then
  redis.call('ZREM', STATUS_INDEX[current], rec['id'])
  redis.call('ZADD', STATUS_INDEX[spec['to']], rec['score'], rec['id'])
  -- The deployment indexes only live jobs: nothing reads its ended ones.
  if LIVE_INDEX[current] then redis.call('ZREM', LIVE_INDEX[current], rec['id']) end
  if LIVE_INDEX[spec['to']] then redis.call('ZADD', LIVE_INDEX[spec['to']], rec['score'], rec['id']) end
  -- Only a queued job may have no stream yet: a job leaves queued with an event, and a job
  -- stored in another status is born ended, with its event (born_ended.lua). The event's
  -- HSET writes the changes.
  blaze_status_event(k, rec, spec['to'], current == 'queued', spec['ttl'], changes)
else
  local args = {}
  for name, value in pairs(changes) do args[#args + 1] = name; args[#args + 1] = value end
  redis.call('HSET', k.job, unpack(args))
end
if spec['read'] then
  local flat = {}
  for name, value in pairs(rec) do flat[#flat + 1] = name; flat[#flat + 1] = value end
  return {1, current, flat}
end
return {1, current}
