-- Change an API key's limits, only while the key exists: a revoke that ran first leaves
-- nothing for an update to half recreate.
-- KEYS[1]: the key's hash (api-key:<sha256>). ARGV: field, value, field, value, ...
-- Returns the key's fields after the change (HGETALL), or nil if there is no such key.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return nil
end
if #ARGV > 0 then
    redis.call('HSET', KEYS[1], unpack(ARGV))
end
return redis.call('HGETALL', KEYS[1])
