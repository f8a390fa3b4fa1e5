-- Renew one of this worker's leases (leases.LeaseKeeper). KEYS[1] the lease, KEYS[2] the job;
-- ARGV: the owner (<worker>:<attempt>), the lease's ms, the worker, the attempt. Extend the
-- lease while it is ours; if it ran out (Redis was away longer than the lease), recreate it
-- only while the job still runs this attempt on this worker: after a reap the job is queued
-- or another attempt's, and its lease not ours. Returns 1 renewed, 2 recreated, 0 not ours.
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if owner then return 0 end
local job = redis.call('HMGET', KEYS[2], 'status', 'worker', 'attempts')
if job[1] == 'running' and job[2] == ARGV[3] and job[3] == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
