-- A queued job's place in its engine's queue (GET /v1/jobs/{id}/position), counted from the
-- end kombu takes messages from (the right): 1 is the next message a worker takes.
-- KEYS[1] the engine's queue. ARGV[1] the text that marks the job's own message (its
-- `"id": "<job id>"` header), ARGV[2] the most messages to look at, ARGV[3] how many the
-- first read takes (each read after it takes twice as many as the one before, so a job near
-- the head costs one short read and one far back a few long ones), ARGV[4] the most one
-- read takes, ARGV[5] the most bytes of messages to look at: a message may hold a large
-- input, and Redis serves nothing else while the script runs.
-- Returns {place, depth}: place 0 when the job's message is not among the first ARGV[2],
-- nor within the first ARGV[5] bytes (farther back, or taken already). The scan stops at the job's message, so it costs what
-- lies ahead of the job, never the whole queue.
local depth = redis.call('LLEN', KEYS[1])
local most = math.min(tonumber(ARGV[2]), depth)
local chunk = tonumber(ARGV[3])
local widest = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local seen = 0
while seen < most do
  local count = math.min(chunk, most - seen)
  local messages = redis.call('LRANGE', KEYS[1], -(seen + count), -(seen + 1))
  for i = #messages, 1, -1 do
    seen = seen + 1
    budget = budget - #messages[i]
    if budget < 0 then return {0, depth} end
    if string.find(messages[i], ARGV[1], 1, true) then return {seen, depth} end
  end
  if #messages < count then break end
  chunk = math.min(chunk * 2, widest)
end
return {0, depth}
