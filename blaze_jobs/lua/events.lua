-- Shared by every script that makes a job event: the loader (scripts.py) puts it first.
-- Such a script's KEYS start with the job's event keys (keys.Keys.event_keys): KEYS[1] the
-- job hash, KEYS[2] its stream, KEYS[3] its deliveries hash, KEYS[4] its webhook order set,
-- KEYS[5] the webhooks queue. The functions take them as a table (blaze_event_keys), with
-- the webhook task's message (broker.webhook_task_template). Names carry a blaze_ prefix:
-- they share the script's scope with the script's own locals.
--
-- They take the job as a table the caller has read already (``rec``: its fields, as the
-- change the event reports left them), so an event costs no read of the job of its own:
-- XADD and the HSET of the job (its fields and its latest event's id), PEXPIREAT for a new
-- stream, and for a webhook delivery HEXISTS, HSET, ZADD and two PEXPIREAT.

local function blaze_event_keys(task_template)
  return {job = KEYS[1], stream = KEYS[2], deliveries = KEYS[3], order = KEYS[4], webhooks = KEYS[5], task = task_template}
end

-- The job's fields as a table.
local function blaze_record(flat)
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  return rec
end

-- The job as JSON: every field, or all but its input (which never changes, and may be large).
-- Never its ``event`` (the id of its latest event, a reader's position). Its ``expires_at_ms``
-- (when Redis drops it) only in a delivery's snapshot (``for_delivery``): the webhook body's
-- artifact URLs are signed until then, the job's own expiry, not one the webhook worker would
-- work out from created_at and its own BLAZE_JOB_TTL_S; an event's job leaves it out.
local BLAZE_NOT_IN_SNAPSHOT = {event = true, expires_at_ms = true}
local BLAZE_NOT_IN_DELIVERY = {event = true}
local function blaze_snapshot(rec, with_input, for_delivery)
  local left_out = BLAZE_NOT_IN_SNAPSHOT
  if for_delivery then left_out = BLAZE_NOT_IN_DELIVERY end
  local copy = {}
  for name, value in pairs(rec) do
    if not left_out[name] and (with_input or name ~= 'input') then copy[name] = value end
  end
  return cjson.encode(copy)
end

-- Queue blaze.webhooks.deliver(job_id, delivery_id): the message is broker.py's, with its
-- slots filled (functions as replacements, so no character of an id is a pattern).
local function blaze_webhook_task(queue, template, job_id, delivery_id, attempt)
  local message = template:gsub('{JOB}', function() return job_id end)
    :gsub('{DELIVERY}', function() return delivery_id end)
    :gsub('{ATTEMPT}', function() return tostring(attempt) end)
  redis.call('LPUSH', queue, message)
end

-- Make a key expire with the job. The job hash expires at its expires_at_ms (Unix ms), the
-- deadline its creator gave its PEXPIREAT, whatever retention this script's caller has. A
-- record without that field (one stored before it existed) expires job_ttl_s after its
-- created_at: ttl_s, the caller's. A deadline already past (an old created_at, or no TTL
-- given) falls back to the job's own remaining TTL. now_ms: Redis's time, from the event's
-- stream id.
local function blaze_expire_with_job(k, key, rec, ttl_s, now_ms)
  local at = tonumber(rec['expires_at_ms'])
  local created = tonumber(rec['created_at'])
  if not at and created and ttl_s then at = (created + ttl_s) * 1000 end
  if at then
    if at > now_ms then
      redis.call('PEXPIREAT', key, string.format('%.0f', at))
      return
    end
  end
  local ttl = redis.call('PTTL', k.job)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- Append an event to the job's stream (trimmed to about maxlen entries, when given) and write
-- ``changes`` (the job fields that go with it; rec holds them already) to the job in one HSET
-- with the event's id as the job's ``event``: a reader gets the job and its position in the
-- stream with one HGETALL (events.job_and_position). When the job's webhook wants the event,
-- record a delivery (with the whole job as it stands, input included, since a delivery's body
-- is the job) and queue its task. Returns the event id.
-- ``whole``: rec holds every field of the job (else the delivery reads the job). ``fresh``:
-- the stream may not exist yet, so it is given the job's expiry; once it exists it keeps it
-- (XADD and trimming leave a TTL alone). The event's time is its stream id's (Redis's clock,
-- in ms): the entry carries no time of its own, and a delivery's ``at`` is the id's.
local function blaze_event(k, rec, whole, fresh, kind, fields, maxlen, ttl_s, changes)
  local entry = {'type', kind}
  for name, value in pairs(fields) do entry[#entry + 1] = name; entry[#entry + 1] = value end
  local event_id
  if maxlen then
    event_id = redis.call('XADD', k.stream, 'MAXLEN', '~', maxlen, '*', unpack(entry))
  else
    event_id = redis.call('XADD', k.stream, '*', unpack(entry))
  end
  local args = {'event', event_id}
  for name, value in pairs(changes) do args[#args + 1] = name; args[#args + 1] = value end
  redis.call('HSET', k.job, unpack(args))
  rec['event'] = event_id
  local now_ms = tonumber(string.match(event_id, '^(%d+)'))
  if fresh then blaze_expire_with_job(k, k.stream, rec, ttl_s, now_ms) end
  local hook, wanted = rec['webhook'], rec['webhook_events']
  if hook and string.find(',' .. (wanted or '') .. ',', ',' .. string.sub(kind, 5) .. ',', 1, true) then
    if redis.call('HEXISTS', k.deliveries, 'gone') == 0 then
      local job_id = rec['id']
      local at = string.format('%d.%03d', math.floor(now_ms / 1000), now_ms % 1000)
      local delivery = cjson.encode({id = event_id, event_id = event_id, type = kind, at = at, url = hook,
        webhook_id = 'msg_' .. job_id .. '_' .. event_id, state = 'pending'})
      local snapshot
      if whole then snapshot = blaze_snapshot(rec, true, true) else snapshot = blaze_snapshot(blaze_record(redis.call('HGETALL', k.job)), true, true) end
      redis.call('HSET', k.deliveries, event_id, delivery, event_id .. ':job', snapshot)
      -- Deliveries whose first attempt is still to come, so each goes after the ones before it.
      redis.call('ZADD', k.order, now_ms, event_id)
      blaze_expire_with_job(k, k.deliveries, rec, ttl_s, now_ms)
      blaze_expire_with_job(k, k.order, rec, ttl_s, now_ms)
      blaze_webhook_task(k.webhooks, k.task, job_id, event_id, 1)
    end
  end
  return event_id
end

-- A text job canceled while it streams ends with the text it streamed: its job.delta pieces
-- since its attempt started, with the rest of the output (usage, seed) as the last piece
-- left it in the job's partial_output. Returns the output's JSON; nil when nothing streamed.
local function blaze_streamed_output(k, rec)
  local partial = rec['partial_output']
  if not partial then return nil end
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
  if #pieces == 0 then return nil end
  local n = #pieces
  for i = 1, math.floor(n / 2) do pieces[i], pieces[n + 1 - i] = pieces[n + 1 - i], pieces[i] end
  local output = cjson.decode(partial)
  output['text'] = table.concat(pieces)
  output['finish_reason'] = 'canceled'
  return cjson.encode(output)
end

-- Throttled progress may stop short of the last step; a success completes it. Returns the
-- progress to write, or nil.
local function blaze_completed_progress(rec, status)
  if status ~= 'succeeded' or not rec['progress'] then return nil end
  local p = cjson.decode(rec['progress'])
  p['step'] = p['total']
  return cjson.encode(p)
end

-- The event of a change of status: job.queued, job.started or job.completed, with the job as
-- it stood (all but its input). rec holds every field of the job, ``changes`` included (the
-- fields the change writes, in the event's HSET); ``fresh`` as blaze_event's.
local function blaze_status_event(k, rec, status, fresh, ttl_s, changes)
  local kind = 'job.completed'
  if status == 'queued' then kind = 'job.queued' elseif status == 'running' then kind = 'job.started' end
  -- Status changes are bounded by the job's attempts: they never trim the stream.
  return blaze_event(k, rec, true, fresh, kind, {job = blaze_snapshot(rec, false)}, nil, ttl_s, changes)
end
