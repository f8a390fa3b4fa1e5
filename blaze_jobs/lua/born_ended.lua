--#include events
-- The job.completed of a job stored already ended (a cache hit at creation).
-- KEYS[1..5] the job's event keys (events.lua). ARGV[1] the webhook task's message template.
local k = blaze_event_keys(ARGV[1])
return blaze_status_event(k, redis.call('HGET', k.job, 'id'), redis.call('HGET', k.job, 'status'))
