-- Record an attempt at a delivery (webhooks.Deliverer). KEYS[1] the job's deliveries hash,
-- KEYS[2] its webhook order set, KEYS[3] the retries set. ARGV[1] the delivery id, ARGV[2]
-- its JSON, ARGV[3] "1" when the receiver answered 410 (the job's later deliveries are
-- skipped), ARGV[4] a retry to schedule ("" for none) at time ARGV[5], ARGV[6] the claim the
-- attempt was made under, ARGV[7] its member of the retries set. Writes only under the
-- attempt's own claim: one past its deadline has been handed back and recorded as lost
-- already, and a late write cannot bring back, without a TTL, what expired with its job.
if redis.call('HGET', KEYS[1], ARGV[1] .. ':claim') ~= ARGV[6] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1] .. ':claim')
redis.call('ZREM', KEYS[3], ARGV[7])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'gone', '1') end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4]) end
return 1
