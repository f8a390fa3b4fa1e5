--#include events
-- The job.completed of a job stored already ended (a cache hit at creation).
-- KEYS[1..5] the job's event keys (events.lua). ARGV[1] the webhook task's message template,
-- ARGV[2] the job's retention (job_ttl_s).
local k = blaze_event_keys(ARGV[1])
local rec = blaze_record(redis.call('HGETALL', k.job))
local progress = blaze_completed_progress(rec, rec['status'])
local changes = {}
if progress then
  rec['progress'] = progress
  changes['progress'] = progress
end
return blaze_status_event(k, rec, rec['status'], true, tonumber(ARGV[2]), changes)
