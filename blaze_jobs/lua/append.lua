--#include events
-- Append an event to a running job's stream (events.append_event, progress.ProgressReporter).
-- KEYS[1..5] the job's event keys (events.lua). ARGV[1] the event type, ARGV[2] a JSON object
-- of the event's fields, ARGV[3] a JSON object of job fields to set with it, ARGV[4] the
-- stream's length bound (events.stream_maxlen), ARGV[5] the webhook task's message template,
-- ARGV[6] the job's retention (job_ttl_s). Only a running job takes such events (a late
-- progress report cannot land after the job's end). Returns the event id, or nil when the
-- job was not running.
local k = blaze_event_keys(ARGV[5])
local found = redis.call('HMGET', k.job, 'status', 'id', 'created_at', 'webhook', 'webhook_events', 'expires_at_ms')
if found[1] ~= 'running' then return false end
local rec = {status = found[1], id = found[2], created_at = found[3], webhook = found[4], webhook_events = found[5],
  expires_at_ms = found[6]}
-- A running job's stream exists (its job.started made it), with the job's expiry. The job
-- fields go in the HSET that records the event's id.
return blaze_event(k, rec, false, false, ARGV[1], cjson.decode(ARGV[2]), ARGV[4], tonumber(ARGV[6]), cjson.decode(ARGV[3]))
