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
-- Then the office policy ([policy.office], 7 fields): success_within ('' = the policy is off),
--       user_findtime, user_threshold, findtime, distinct_users, rate, max_users.
--       A success with a user capture is 'S:' .. the user's keyed hash (its tag: the member of the
--       address's successes, jail name 'office_ok'); an auth failure with a user capture carries
--       ';' .. the user's hash after its jail items ("1,3;9f0c...") and ';' then three tags after its
--       jail tags: for 'office_users' (weight 'd' .. hash), 'office_rate' and 'office_user:' .. hash.
--       Such a failure is the office's (the local Policy's `_is_office`) when the address's successes
--       (P .. 's:IP:office_ok', one member per user, the newest max_users, within success_within of
--       the failure) name another user: then it is scored in 'office_users' (distinct failing users),
--       else 'office_rate', else per (address, user) in P .. 's:IP:office_user:HASH' (a user
--       candidate at user_threshold), exactly as the Policy does, and not in the address's jails. A
--       user banned at that address (P .. 'ubans', field IP|HASH, a signed user ban json in force) is
--       skipped. A success for a user clears that user's own window there.
-- Returns {candidates (json: ip, jail, filter, uid, t, ev = [member, score, ...] of that key,
--          off = [member, score, ...] of the source's offences; the newest 10000 of each at most;
--          a user candidate has jail 'office_user' and u = the user's hash), score keys reset by successes,
--          events skipped as banned, [ip, ban json, ...] of the bans they were skipped for,
--          [ip, user hash, user ban json, ...] of the user bans office failures were skipped for,
--          [json: ip, u, ok = [member, score, ...] of the successes that made the address an office
--          for that user (the first such failure of each (ip, user) in this call, 100 at most)]}.
-- The node verifies those last two as it verifies candidates: what does not verify decides nothing.
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
local office = nil
if ARGV[i] ~= '' then
  office = {within = tonumber(ARGV[i]), user_findtime = tonumber(ARGV[i + 1]), user_threshold = tonumber(ARGV[i + 2]),
            findtime = tonumber(ARGV[i + 3]), users = tonumber(ARGV[i + 4]), rate = tonumber(ARGV[i + 5]),
            max_users = tonumber(ARGV[i + 6])}
  office.users_jail = {name = 'office_users', max_values = math.max(100, office.users)}
  office.ok_jail = {name = 'office_ok', max_values = office.max_users}
end
i = i + 7
local banned, values = {}, {}
local function in_force(v)  -- a shared ban's json (address or user ban): not expired at `now`
  if not v then return false end
  local ok, ban = pcall(cjson.decode, v)
  if not ok or type(ban) ~= 'table' then return false end
  local e = tonumber(ban.expires)
  return (e == nil) or (e > now)
end
local function is_banned(ip)
  if banned[ip] ~= nil then return banned[ip] end
  local v = redis.call('HGET', P .. 'bans', ip)
  local b = in_force(v)
  if b then values[ip] = v end
  banned[ip] = b
  return b
end
local out, held = {}, {}
local candidate = {}
local resets, skipped = 0, 0
local uheld, offices, ucandidate, office_seen, uban = {}, {}, {}, {}, {}
local function sum_of(members)
  local score = 0
  for m = 1, #members, 2 do score = score + (tonumber(string.match(members[m], '^[^|]*|([^|]*)')) or 0) end
  return score
end
-- the address's successes for users other than `h` within success_within of `t` (members with scores)
local function office_of(ip, h, t)
  local got = redis.call('ZRANGEBYSCORE', P .. 's:' .. ip .. ':office_ok', string.format('%.6f', t - office.within),
                         '+inf', 'WITHSCORES')
  local other = {}
  for m = 1, #got, 2 do
    if string.match(got[m], '^[^|]*|d([^|]*)') ~= h and #other < 200 then
      table.insert(other, got[m])
      table.insert(other, got[m + 1])
    end
  end
  return other
end
local function user_banned(ip, h)
  local f = ip .. '|' .. h
  if uban[f] ~= nil then return uban[f] end
  local v = redis.call('HGET', P .. 'ubans', f)
  local b = in_force(v)
  if b then
    table.insert(uheld, ip)
    table.insert(uheld, h)
    table.insert(uheld, v)
  end
  uban[f] = b
  return b
end
local function candidate_of(ip, jail, key, members, filter, uid, ts, t)
  local okey = P .. 'off:' .. ip
  redis.call('ZREMRANGEBYSCORE', okey, '-inf', '(' .. string.format('%.6f', t - memory))
  local off = redis.call('ZRANGE', okey, 0, -1, 'WITHSCORES')
  candidate[ip] = true
  if #members > 2 * MAX_RETURNED then members = redis.call('ZRANGE', key, -MAX_RETURNED, -1, 'WITHSCORES') end
  if #off > 2 * MAX_RETURNED then off = redis.call('ZRANGE', okey, -MAX_RETURNED, -1, 'WITHSCORES') end
  table.insert(out, cjson.encode({ip = ip, jail = jail, filter = filter, uid = uid, t = ts, ev = members, off = off}))
end
-- an office's auth failure for the user hashed `h` (see the header): the Policy's `_score_office`
local function score_office(ip, h, t, ts, w, filter, uid, tag)
  local f = ip .. '|' .. h
  if ucandidate[f] or user_banned(ip, h) then
    skipped = skipped + 1
    return
  end
  if candidate[ip] then return end  -- the address is decided in this call: its further events count no more
  local since = string.format('%.6f', t - office.findtime)
  local key = P .. 's:' .. ip .. ':office_users'
  if tonumber(w) > 0 then
    local vkey = P .. 'sv:' .. ip .. ':office_users'
    add_distinct(key, vkey, office.users_jail, since, t, h, uid .. '|d' .. h .. '|' .. (tag[1] or ''))
    redis.call('PEXPIRE', key, math.ceil(office.findtime * 1000) + 1000)
    redis.call('PEXPIRE', vkey, math.ceil(office.findtime * 1000) + 1000)
    local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    if #members / 2 >= office.users then
      candidate_of(ip, 'office_users', key, members, filter, uid, ts, t)
      return
    end
  end
  key = P .. 's:' .. ip .. ':office_rate'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. since)
  redis.call('ZADD', key, ts, uid .. '|' .. w .. '|' .. (tag[2] or ''))
  redis.call('PEXPIRE', key, math.ceil(office.findtime * 1000) + 1000)
  local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  if sum_of(members) >= office.rate then
    candidate_of(ip, 'office_rate', key, members, filter, uid, ts, t)
    return
  end
  key = P .. 's:' .. ip .. ':office_user:' .. h
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.6f', t - office.user_findtime))
  redis.call('ZADD', key, ts, uid .. '|' .. w .. '|' .. (tag[3] or ''))
  redis.call('PEXPIRE', key, math.ceil(office.user_findtime * 1000) + 1000)
  members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  if sum_of(members) >= office.user_threshold then
    ucandidate[f] = true
    if #members > 2 * MAX_RETURNED then members = redis.call('ZRANGE', key, -MAX_RETURNED, -1, 'WITHSCORES') end
    table.insert(out, cjson.encode({ip = ip, jail = 'office_user', u = h, filter = filter, uid = uid, t = ts,
                                    ev = members, off = {}}))
  end
end
while i <= #ARGV do
  local ip, js, ts, w, filter, uid, tags = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                                           ARGV[i + 5], ARGV[i + 6]
  local t = tonumber(ts)
  local otags = nil
  i = i + 7
  local oh = nil  -- an auth failure's user hash (the office policy), its jail items and tags apart
  if office and string.find(js, ';', 1, true) then
    js, oh = string.match(js, '^([^;]*);(%x+)$')
    tags, otags = string.match(tags, '^([^;]*);?(.*)$')
  end
  if js == 'S' or string.sub(js, 1, 2) == 'S:' then
    for j = 1, nj do
      if jails[j].reset then
        resets = resets + redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name)
        if jails[j].max_values then redis.call('DEL', P .. 'sv:' .. ip .. ':' .. jails[j].name) end
      end
    end
    local h = string.match(js, '^S:(%x+)$')
    if office and h and not is_banned(ip) then  -- the office policy: a success for this user, shared
      local key, vkey = P .. 's:' .. ip .. ':office_ok', P .. 'sv:' .. ip .. ':office_ok'
      add_distinct(key, vkey, office.ok_jail, string.format('%.6f', t - office.within), t, h,
                   uid .. '|d' .. h .. '|' .. tags)
      redis.call('PEXPIRE', key, math.ceil(office.within * 1000) + 1000)
      redis.call('PEXPIRE', vkey, math.ceil(office.within * 1000) + 1000)
      if redis.call('DEL', P .. 's:' .. ip .. ':office_user:' .. h) > 0 then resets = resets + 1 end
    end
  elseif is_banned(ip) then
    skipped = skipped + 1
    if values[ip] then
      table.insert(held, ip)
      table.insert(held, values[ip])
      values[ip] = nil
    end
  elseif oh and #office_of(ip, oh, t) > 0 then
    local seen = ip .. '|' .. oh
    if not office_seen[seen] and #offices < 1000 then
      office_seen[seen] = true
      table.insert(offices, cjson.encode({ip = ip, u = oh, ok = office_of(ip, oh, t)}))
    end
    local tag = {}
    for x in string.gmatch(otags or '', '[^,]+') do table.insert(tag, x) end
    score_office(ip, oh, t, ts, w, filter, uid, tag)
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
        if score >= jail.threshold then  -- (bounded work for the node: the newest members)
          candidate_of(ip, jail.name, key, members, filter, uid, ts, t)
        end
      end
    end
  end
end
return {out, resets, skipped, held, uheld, offices}
