-- Cluster scoring: one call scores a batch of events from one node (sipguard/cluster/scoring.py
-- builds ARGV in ClusterPolicy.score_args; the same semantics as the local Policy, checked case by
-- case in tests/test_policy_cases.py).
-- ARGV: prefix, node, now, stream maxlen, bantime, bantime_factor, max_bantime ('' = no cap),
--       offence_memory, number of jails; per jail: name, findtime, threshold,
--       own bantime ('' = escalate, 'perm' = permanent, else seconds), reset_on_success ('1'/'0');
--       per event: ip, jails ('S' = a success, else 1-based jail indices "1,3"), time, weight,
--       filter, uid (unique per event; the ban id is node .. ':' .. uid).
-- Returns {ban json of every ban decided, score keys reset by successes, events skipped as banned}.
local P, node, now, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local bantime, factor, cap, memory = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local nj = tonumber(ARGV[9])
local jails = {}
local i = 10
for j = 1, nj do
  jails[j] = {name = ARGV[i], findtime = tonumber(ARGV[i + 1]), threshold = tonumber(ARGV[i + 2]),
              bantime = ARGV[i + 3], reset = ARGV[i + 4] == '1'}
  i = i + 5
end
local banned = {}
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
  end
  banned[ip] = b
  return b
end
local out = {}
local resets, skipped = 0, 0
while i <= #ARGV do
  local ip, js, t, w, filter, uid = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  if js == 'S' then
    for j = 1, nj do
      if jails[j].reset then resets = resets + redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name) end
    end
  elseif is_banned(ip) then
    skipped = skipped + 1
  else
    for idx in string.gmatch(js, '%d+') do
      local jail = jails[tonumber(idx)]
      local key = P .. 's:' .. ip .. ':' .. jail.name
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.6f', t - jail.findtime))
      redis.call('ZADD', key, string.format('%.6f', t), uid .. '|' .. w)
      redis.call('PEXPIRE', key, math.ceil(jail.findtime * 1000) + 1000)
      local score = 0
      for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
        score = score + (tonumber(string.match(m, '|([^|]*)$')) or 0)
      end
      if score >= jail.threshold then
        local okey = P .. 'off:' .. ip
        redis.call('ZREMRANGEBYSCORE', okey, '-inf', '(' .. string.format('%.6f', t - memory))
        local offence = redis.call('ZCARD', okey) + 1
        local id = node .. ':' .. uid
        redis.call('ZADD', okey, string.format('%.6f', t), id)
        redis.call('PEXPIRE', okey, math.ceil(memory * 1000))
        local dur
        if jail.bantime == 'perm' then dur = nil
        elseif jail.bantime ~= '' then dur = tonumber(jail.bantime)
        else
          dur = bantime * factor ^ math.max(0, offence - 1)
          if cap ~= nil and dur > cap then dur = cap end
          if dur ~= dur or dur > 3155760000 then dur = nil end  -- past 100 years (MAX_DURATION): permanent
        end
        for j = 1, nj do redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name) end
        local ban = {ip = ip, reason = jail.name .. ':' .. filter, created = now, score = score,
                     offence = offence, manual = false, id = id, origin = node}
        if dur ~= nil then ban.expires = now + dur end
        local payload = cjson.encode(ban)
        redis.call('HSET', P .. 'bans', ip, payload)
        redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*',
                   'op', 'ban', 'ip', ip, 'id', id, 'origin', node, 'ban', payload)
        banned[ip] = true
        table.insert(out, payload)
        break
      end
    end
  end
end
return {out, resets, skipped}
