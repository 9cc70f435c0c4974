-- Cluster scoring: one call scores a batch of events from one node (sipguard/cluster/scoring.py
-- builds ARGV in ClusterPolicy.score_args and reads the result in ClusterPolicy.verdicts; the same
-- semantics as the local Policy, checked case by case in tests/test_policy_cases.py).
-- It never decides a ban and never signs anything (the secret never reaches Redis): when a source's
-- window reaches a jail's threshold it returns a candidate with the events behind it and the
-- source's offences, and the node verifies every event's tag before it claims the ban (PUBLISH_LUA,
-- mode 'claim'), so events a stranger ZADDs into a score key decide nothing.
-- ARGV: prefix, node, now, stream maxlen, bantime, bantime_factor, max_bantime ('' = no cap),
--       offence_memory, number of jails; per jail: name, findtime, threshold,
--       own bantime ('' = escalate, 'perm' = permanent, else seconds), reset_on_success ('1'/'0'),
--       max_values ('' = a jail that sums weights; a number = a distinct jail keeping that many values);
--       per event: ip, jails ('S' = a success, else 1-based jail indices "1,3"; a distinct jail's index
--       carries the value's hash, "2:d5f0c...", and only when the event counts there), time, weight,
--       filter, uid (unique per event), tags (one per jail index, "t1,t3"; '' when unsigned).
-- A score key's member is uid|weight|tag, its score the event's time. In a distinct jail the weight
-- field is 'd' .. the value's hash (signed as the weight), the key holds one member per value (the
-- latest; the hash P .. 'sv:IP:JAIL' maps a value to its member), at most max_values (the oldest go
-- first), and the score is how many members it holds.
-- Returns {candidates (json: ip, jail, filter, uid, t, ev = [member, score, ...] of that key,
--          off = [member, score, ...] of the source's offences; the newest 10000 of each at most), score keys reset by successes,
--          events skipped as banned, [ip, ban json, ...] of the bans they were skipped for}.
local P, node, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local MAX_RETURNED = 10000  -- members of a candidate's window (and offences) returned at most
local memory = tonumber(ARGV[8])
local nj = tonumber(ARGV[9])
local jails = {}
local i = 10
for j = 1, nj do
  jails[j] = {name = ARGV[i], findtime = tonumber(ARGV[i + 1]), threshold = tonumber(ARGV[i + 2]),
              reset = ARGV[i + 4] == '1', max_values = tonumber(ARGV[i + 5])}
  i = i + 6
end
-- A distinct jail's key: drop the members older than `since` and their value entries, then put the
-- value's member (unless the one held is newer), then drop the oldest beyond max_values.
local function add_distinct(key, vkey, jail, since, t, h, member)
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. since)
  for n = 1, #old do
    local oh = string.match(old[n], '^[^|]*|d([^|]*)')
    if oh and redis.call('HGET', vkey, oh) == old[n] then redis.call('HDEL', vkey, oh) end
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. since) end
  local prev = redis.call('HGET', vkey, h)
  if prev then
    local ps = redis.call('ZSCORE', key, prev)
    if ps and tonumber(ps) >= t then return end
    redis.call('ZREM', key, prev)
  end
  redis.call('ZADD', key, string.format('%.6f', t), member)
  redis.call('HSET', vkey, h, member)
  local over = redis.call('ZCARD', key) - jail.max_values
  if over > 0 then
    local gone = redis.call('ZRANGE', key, 0, over - 1)
    for n = 1, #gone do
      local oh = string.match(gone[n], '^[^|]*|d([^|]*)')
      if oh then redis.call('HDEL', vkey, oh) end
    end
    redis.call('ZREMRANGEBYRANK', key, 0, over - 1)
  end
end
local banned, values = {}, {}
local function is_banned(ip)
  if banned[ip] ~= nil then return banned[ip] end
  local v = redis.call('HGET', P .. 'bans', ip)
  local b = false
  if v then
    local ok, ban = pcall(cjson.decode, v)
    if ok and type(ban) == 'table' then
      local e = tonumber(ban.expires)
      b = (e == nil) or (e > now)
    end
    if b then values[ip] = v end
  end
  banned[ip] = b
  return b
end
local out, held = {}, {}
local candidate = {}
local resets, skipped = 0, 0
while i <= #ARGV do
  local ip, js, ts, w, filter, uid, tags = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                                           ARGV[i + 5], ARGV[i + 6]
  local t = tonumber(ts)
  i = i + 7
  if js == 'S' then
    for j = 1, nj do
      if jails[j].reset then
        resets = resets + redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name)
        if jails[j].max_values then redis.call('DEL', P .. 'sv:' .. ip .. ':' .. jails[j].name) end
      end
    end
  elseif is_banned(ip) then
    skipped = skipped + 1
    if values[ip] then
      table.insert(held, ip)
      table.insert(held, values[ip])
      values[ip] = nil
    end
  else
    local tag = {}
    for x in string.gmatch(tags, '[^,]+') do table.insert(tag, x) end
    local k = 0
    for item in string.gmatch(js, '[^,]+') do
      k = k + 1
      local idx, h = string.match(item, '^(%d+):?(%x*)$')
      local jail = jails[tonumber(idx)]
      local key = P .. 's:' .. ip .. ':' .. jail.name
      local since = string.format('%.6f', t - jail.findtime)
      if jail.max_values then
        local vkey = P .. 'sv:' .. ip .. ':' .. jail.name
        add_distinct(key, vkey, jail, since, t, h, uid .. '|d' .. h .. '|' .. (tag[k] or ''))
        redis.call('PEXPIRE', vkey, math.ceil(jail.findtime * 1000) + 1000)
      else
        redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. since)
        redis.call('ZADD', key, string.format('%.6f', t), uid .. '|' .. w .. '|' .. (tag[k] or ''))
      end
      redis.call('PEXPIRE', key, math.ceil(jail.findtime * 1000) + 1000)
      if not candidate[ip] then
        local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
        local score = 0
        if jail.max_values then
          score = #members / 2
        else
          for m = 1, #members, 2 do
            score = score + (tonumber(string.match(members[m], '^[^|]*|([^|]*)')) or 0)
          end
        end
        if score >= jail.threshold then
          local okey = P .. 'off:' .. ip
          redis.call('ZREMRANGEBYSCORE', okey, '-inf', '(' .. string.format('%.6f', t - memory))
          local off = redis.call('ZRANGE', okey, 0, -1, 'WITHSCORES')
          candidate[ip] = true
          if #members > 2 * MAX_RETURNED then  -- bounded work for the node: the newest members
            members = redis.call('ZRANGE', key, -MAX_RETURNED, -1, 'WITHSCORES')
          end
          if #off > 2 * MAX_RETURNED then off = redis.call('ZRANGE', okey, -MAX_RETURNED, -1, 'WITHSCORES') end
          table.insert(out, cjson.encode({ip = ip, jail = jail.name, filter = filter, uid = uid, t = ts,
                                          ev = members, off = off}))
        end
      end
    end
  end
end
return {out, resets, skipped, held}
