-- Stand for election as the reaper (reaper.Reaper). KEYS[1] the reaper's lock; ARGV[1] the
-- worker standing, ARGV[2] the lock's time to live in ms. The holder keeps it; anyone takes
-- it when nobody holds it. Returns 1 if elected.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
