-- Shared by every script that makes a job event: the loader (scripts.py) puts it first.
-- Such a script's KEYS start with the job's event keys (keys.Keys.event_keys): KEYS[1] the
-- job hash, KEYS[2] its stream, KEYS[3] its deliveries hash, KEYS[4] its webhook order set,
-- KEYS[5] the webhooks queue. The functions take them as a table (blaze_event_keys), with
-- the webhook task's message (broker.webhook_task_template). Names carry a blaze_ prefix:
-- they share the script's scope with the script's own locals.

local function blaze_event_keys(task_template)
  return {job = KEYS[1], stream = KEYS[2], deliveries = KEYS[3], order = KEYS[4], webhooks = KEYS[5], task = task_template}
end

local function blaze_snapshot(job_key, with_input)
  local flat = redis.call('HGETALL', job_key)
  local record = {}
  for i = 1, #flat, 2 do
    if with_input or flat[i] ~= 'input' then record[flat[i]] = flat[i + 1] end
  end
  return cjson.encode(record)
end

-- Queue blaze.webhooks.deliver(job_id, delivery_id): the message is broker.py's, with its
-- slots filled (functions as replacements, so no character of an id is a pattern).
local function blaze_webhook_task(queue, template, job_id, delivery_id, attempt)
  local message = template:gsub('{JOB}', function() return job_id end)
    :gsub('{DELIVERY}', function() return delivery_id end)
    :gsub('{ATTEMPT}', function() return tostring(attempt) end)
  redis.call('LPUSH', queue, message)
end

-- Append an event to the job's stream (trimmed to about maxlen entries, when given); when the
-- job's webhook wants it, record a delivery (with the whole job as it stands, input
-- included, since a delivery's body is the job) and queue its task. Returns the event id.
local function blaze_event(k, job_id, kind, fields, maxlen)
  local now = redis.call('TIME')
  local at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
  local entry = {'type', kind, 'at', at}
  for name, value in pairs(fields) do entry[#entry + 1] = name; entry[#entry + 1] = value end
  local event_id
  if maxlen then
    event_id = redis.call('XADD', k.stream, 'MAXLEN', '~', maxlen, '*', unpack(entry))
  else
    event_id = redis.call('XADD', k.stream, '*', unpack(entry))
  end
  local ttl = redis.call('PTTL', k.job)
  if ttl > 0 then redis.call('PEXPIRE', k.stream, ttl) end
  local hook = redis.call('HMGET', k.job, 'webhook', 'webhook_events')
  if hook[1] and string.find(',' .. (hook[2] or '') .. ',', ',' .. string.sub(kind, 5) .. ',', 1, true) then
    if redis.call('HEXISTS', k.deliveries, 'gone') == 0 then
      local delivery = cjson.encode({id = event_id, event_id = event_id, type = kind, at = at, url = hook[1],
        webhook_id = 'msg_' .. job_id .. '_' .. event_id, state = 'pending'})
      redis.call('HSET', k.deliveries, event_id, delivery, event_id .. ':job', blaze_snapshot(k.job, true))
      -- Deliveries whose first attempt is still to come, so each goes after the ones before it.
      redis.call('ZADD', k.order, string.match(event_id, '^(%d+)'), event_id)
      if ttl > 0 then redis.call('PEXPIRE', k.deliveries, ttl); redis.call('PEXPIRE', k.order, ttl) end
      blaze_webhook_task(k.webhooks, k.task, job_id, event_id, 1)
    end
  end
  return event_id
end

-- A text job canceled while it streams ends with the text it streamed: its job.delta pieces
-- since its attempt started, with the rest of the output (usage, seed) as the last piece
-- left it in the job's partial_output. Nothing streamed, no output.
local function blaze_streamed_output(k)
  local partial = redis.call('HGET', k.job, 'partial_output')
  if not partial then return end
  local pieces = {}
  for _, entry in ipairs(redis.call('XREVRANGE', k.stream, '+', '-')) do
    local kind, text
    local flat = entry[2]
    for i = 1, #flat, 2 do
      if flat[i] == 'type' then kind = flat[i + 1] elseif flat[i] == 'text' then text = flat[i + 1] end
    end
    if kind == 'job.started' then break end
    if kind == 'job.delta' and text then pieces[#pieces + 1] = text end
  end
  if #pieces == 0 then return end
  local n = #pieces
  for i = 1, math.floor(n / 2) do pieces[i], pieces[n + 1 - i] = pieces[n + 1 - i], pieces[i] end
  local output = cjson.decode(partial)
  output['text'] = table.concat(pieces)
  output['finish_reason'] = 'canceled'
  redis.call('HSET', k.job, 'output', cjson.encode(output))
end

local function blaze_status_event(k, job_id, status)
  local kind = 'job.completed'
  if status == 'queued' then kind = 'job.queued' elseif status == 'running' then kind = 'job.started' end
  -- Throttled progress may stop short of the last step; a success completes it.
  local progress = redis.call('HGET', k.job, 'progress')
  if progress and status == 'succeeded' then
    local p = cjson.decode(progress)
    p['step'] = p['total']
    redis.call('HSET', k.job, 'progress', cjson.encode(p))
  end
  -- Status changes are bounded by the job's attempts: they never trim the stream.
  return blaze_event(k, job_id, kind, {job = blaze_snapshot(k.job, false)}, nil)
end
