-- A tenant's webhook signing secrets (signing.tenant_secrets), made on first use.
-- KEYS[1] the tenant's secret, KEYS[2] its previous secret (kept for a rotation's grace
-- period), KEYS[3] the deployment's secret from before tenants had their own.
-- ARGV[1] a fresh secret, stored when the tenant has none; ARGV[2] '1' when the tenant is the
-- default one, which adopts the deployment's old secret, so receivers keep verifying after an
-- upgrade. Returns the secret, the previous one (or false) and its remaining time in ms.
local secret = redis.call('GET', KEYS[1])
if not secret then
  secret = ARGV[2] == '1' and redis.call('GET', KEYS[3]) or ARGV[1]
  redis.call('SET', KEYS[1], secret)
end
return {secret, redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[2])}
