-- A queued job's place in its engine's queue (GET /v1/jobs/{id}/position), counted from the
-- end kombu takes messages from (the right): 1 is the next message a worker takes.
-- KEYS[1] the engine's queue. ARGV[1] the text that marks the job's own message (its
-- `"id": "<job id>"` header), ARGV[2] the most messages to look at, ARGV[3] how many the
-- first read takes (each read after it takes twice as many as the one before, so a job near
-- the head costs one short read and one far back a few long ones).
-- Returns {place, depth}: place 0 when the job's message is not among the first ARGV[2]
-- (farther back, or taken already). The scan stops at the job's message, so it costs what
-- lies ahead of the job, never the whole queue.
local depth = redis.call('LLEN', KEYS[1])
local most = math.min(tonumber(ARGV[2]), depth)
local chunk = tonumber(ARGV[3])
local seen = 0
while seen < most do
  local count = math.min(chunk, most - seen)
  local messages = redis.call('LRANGE', KEYS[1], -(seen + count), -(seen + 1))
  for i = #messages, 1, -1 do
    seen = seen + 1
    if string.find(messages[i], ARGV[1], 1, true) then return {seen, depth} end
  end
  if #messages < count then break end
  chunk = chunk * 2
end
return {0, depth}
