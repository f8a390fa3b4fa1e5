--#include events
-- Send a delivery again (POST .../deliveries/<id>/redeliver). KEYS[1] the job's deliveries
-- hash, KEYS[2] the webhooks queue. ARGV[1] the job id, ARGV[2] the delivery to send again,
-- ARGV[3] the webhook task's message template. Records a new delivery of the same event
-- (same webhook-id and body), lifts a receiver's earlier 410, and queues it. Returns the new
-- delivery's JSON, or nil when there is no such delivery.
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then return false end
local old = cjson.decode(raw)
local n = redis.call('HINCRBY', KEYS[1], old['event_id'] .. ':redeliveries', 1)
local new_id = old['event_id'] .. '.' .. n
local delivery = cjson.encode({id = new_id, event_id = old['event_id'], type = old['type'], at = old['at'],
  url = old['url'], webhook_id = old['webhook_id'], state = 'pending', redelivery_of = ARGV[2]})
redis.call('HSET', KEYS[1], new_id, delivery, new_id .. ':job', redis.call('HGET', KEYS[1], ARGV[2] .. ':job'))
redis.call('HDEL', KEYS[1], 'gone')
blaze_webhook_task(KEYS[2], ARGV[3], ARGV[1], new_id, 1)
return delivery
