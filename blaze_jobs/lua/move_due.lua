--#include events
-- Queue the due members of the retries set (webhook_retries.RetryMover), each exactly once.
-- KEYS[1] the retries set, KEYS[2] the webhooks queue, then for each member ARGV names, the
-- deliveries hash and the webhook order set of its job. ARGV[1] the webhook task's message
-- template, ARGV[2] now, ARGV[3] the error an attempt lost in flight records
-- (webhook_retries.LOST_ERROR), ARGV[4..] the members read as due (a member another mover
-- took meanwhile is no longer in the set, and skipped). Nothing is queued for a delivery that
-- expired with its job. A member whose delivery still holds the claim of an attempt is one
-- in flight past its deadline: that attempt is recorded as lost (the receiver may have had
-- it: the same webhook-id tells) and the next one queued. Returns how many moved and how
-- many were lost in flight.
local moved, lost = 0, 0
for i = 4, #ARGV do
  local member = ARGV[i]
  local deliveries, order = KEYS[2 * (i - 3) + 1], KEYS[2 * (i - 3) + 2]
  if redis.call('ZREM', KEYS[1], member) == 1 then
    moved = moved + 1
    local job_id, delivery_id, attempt = string.match(member, '^(%S+) (%S+) (%S+)$')
    local claim = redis.call('HGET', deliveries, delivery_id .. ':claim')
    if claim then
      local delivery = cjson.decode(redis.call('HGET', deliveries, delivery_id))
      local started = cjson.decode(claim)
      if type(delivery['attempts']) ~= 'table' then delivery['attempts'] = {} end
      table.insert(delivery['attempts'], {attempt = tonumber(attempt), at = started['at'], status_code = cjson.null,
        error = ARGV[3], duration_ms = (tonumber(ARGV[2]) - started['t']) * 1000})
      delivery['state'] = 'retrying'
      delivery['next_attempt_at'] = nil
      redis.call('HSET', deliveries, delivery_id, cjson.encode(delivery))
      redis.call('HDEL', deliveries, delivery_id .. ':claim')
      redis.call('ZREM', order, delivery_id)
      attempt = tonumber(attempt) + 1
      lost = lost + 1
    end
    if redis.call('EXISTS', deliveries) == 1 then blaze_webhook_task(KEYS[2], ARGV[1], job_id, delivery_id, attempt) end
  end
end
return {moved, lost}
