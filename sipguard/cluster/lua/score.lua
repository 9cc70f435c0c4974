-- Cluster scoring: one call scores a batch of events from one node (sipguard/cluster/scoring.py
-- builds ARGV in ClusterPolicy.score_args and reads the result in ClusterPolicy.verdicts; the same
-- semantics as the local Policy, checked case by case in tests/test_policy_cases.py).
-- It never decides a ban and never signs anything (the secret never reaches Redis): when a source's
-- window reaches a jail's threshold it returns a candidate with the events behind it and the
-- source's offences, and the node verifies every event's tag before it claims the ban (PUBLISH_LUA,
-- mode 'claim'), so events a stranger ZADDs into a score key decide nothing.
-- ARGV: prefix, node, now, stream maxlen, bantime, bantime_factor, max_bantime ('' = no cap),
--       offence_memory, number of jails; per jail: name, findtime, threshold,
--       own bantime ('' = escalate, 'perm' = permanent, else seconds), reset_on_success ('1'/'0');
--       per event: ip, jails ('S' = a success, else 1-based jail indices "1,3"), time, weight,
--       filter, uid (unique per event), tags (one per jail index, "t1,t3"; '' when unsigned).
-- A score key's member is uid|weight|tag, its score the event's time.
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
              reset = ARGV[i + 4] == '1'}
  i = i + 5
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
      if jails[j].reset then resets = resets + redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name) end
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
    for idx in string.gmatch(js, '%d+') do
      k = k + 1
      local jail = jails[tonumber(idx)]
      local key = P .. 's:' .. ip .. ':' .. jail.name
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.6f', t - jail.findtime))
      redis.call('ZADD', key, string.format('%.6f', t), uid .. '|' .. w .. '|' .. (tag[k] or ''))
      redis.call('PEXPIRE', key, math.ceil(jail.findtime * 1000) + 1000)
      if not candidate[ip] then
        local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
        local score = 0
        for m = 1, #members, 2 do
          score = score + (tonumber(string.match(members[m], '^[^|]*|([^|]*)')) or 0)
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
