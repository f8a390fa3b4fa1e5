-- Rotate a tenant's webhook signing secret (signing.rotate_async): the new one signs from now
-- on, the one it replaces keeps signing beside it for the grace period, then expires.
-- KEYS as in webhook_secrets.lua: the tenant's secret, its previous one, the deployment's old
-- secret. ARGV[1] the new secret, ARGV[2] the grace period in ms (0: none, as after a leak:
-- the replaced secret is dropped at once), ARGV[3] '1' for the default tenant (whose secret
-- may still be the deployment's old one). A rotation within
-- an earlier one's grace period ends that period: only the secret just replaced is kept.
-- Returns the new secret, the previous one (or false) and its remaining time in ms.
local old = redis.call('GET', KEYS[1])
if not old and ARGV[3] == '1' then old = redis.call('GET', KEYS[3]) end
redis.call('SET', KEYS[1], ARGV[1])
local grace = tonumber(ARGV[2])
if old and grace > 0 then
  redis.call('SET', KEYS[2], old, 'PX', grace)
  return {ARGV[1], old, grace}
end
redis.call('DEL', KEYS[2])
return {ARGV[1], false, -2}
