-- Compare-and-delete: drop a key only while it still holds this owner (an attempt's lease,
-- the reaper's lock). KEYS[1] the key; ARGV[1] the owner. Returns 1 if dropped.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
