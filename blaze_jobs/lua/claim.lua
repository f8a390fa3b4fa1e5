-- Claim a delivery's next attempt for this webhook worker (webhooks.Deliverer.deliver).
-- KEYS[1] the job's deliveries hash, KEYS[2] its webhook order set, KEYS[3] the retries set.
-- ARGV[1] the job id, ARGV[2] the delivery id, ARGV[3] the claim (JSON: token, start),
-- ARGV[4] its deadline. The attempt is then in the retries set, due at its deadline, and the
-- delivery holds the claim. Nothing is claimed when the delivery ended or expired with its
-- job, or when that attempt is in the retries set already (in flight on another worker, or
-- scheduled for later): the message is then a duplicate, such as the one Redis hands back
-- after its visibility timeout. Returns the verdict and, when claimed, the delivery, the job
-- as it stood, the job's 410 flag and the first deliveries still waiting for a first attempt.
local found = redis.call('HMGET', KEYS[1], ARGV[2], ARGV[2] .. ':job', 'gone')
if not found[1] or not found[2] then return {'missing'} end
local delivery = cjson.decode(found[1])
if delivery['state'] ~= 'pending' and delivery['state'] ~= 'retrying' then return {delivery['state']} end
local attempts = delivery['attempts']
local number = (type(attempts) == 'table' and #attempts or 0) + 1
local member = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. number
if redis.call('ZSCORE', KEYS[3], member) then return {'duplicate'} end
redis.call('ZADD', KEYS[3], ARGV[4], member)
redis.call('HSET', KEYS[1], ARGV[2] .. ':claim', ARGV[3])
return {'claimed', found[1], found[2], found[3], unpack(redis.call('ZRANGE', KEYS[2], 0, 9))}
