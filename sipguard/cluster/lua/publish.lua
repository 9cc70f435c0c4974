-- Publishing one ban or unban (sipguard/cluster/bridge.py: ClusterBridge._flush for the outbox, and
-- the claim of a ban the cluster score decided, ClusterPolicy.claim_args): a ban wins only over older
-- ones (created, id) and over no later unban; unbans are deduplicated by id. Every value arrives
-- signed by the node (the ban json carries its tag, an unban its `sig`); this script only stores and
-- appends what it is given and never computes a tag (the secret never reaches Redis).
-- ARGV: prefix, stream maxlen, op ('ban' | 'bans' | 'unban' | 'unban_all'), ip, id, origin,
--       payload (the ban json, or the unban time), offence_memory, unban memory, jail names "a,b",
--       sig (of an unban), offence member (id|tag of an automatic ban, '' = the id), offence time,
--       claim ('1': a ban is refused while the shared set holds one in force: the score's
--       decision is claimed once for the whole fleet), now.
-- User bans: see the block before the unbans below (ARGV[16], ARGV[17]).
-- Returns 1 when applied (and appended to the stream), 0 when stale, a duplicate or refused.
-- Bulk: op 'bans' publishes many bans in one call (a node's list: an import, the bans it re-publishes):
--   ARGV[7] the list as the node signed it (a json array of the ban jsons), ARGV[11] its tag, and from
--   ARGV[16] on five per ban: ip, id, ban json, offence member, offence time. Each ban is decided as one
--   'ban' is; one stream entry carries the list with its tag and `skip`, the 1-based positions this
--   script refused (a node applies the others). Returns the number applied.
local P, maxlen, op, ip, id, origin, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local memory, unban_memory = tonumber(ARGV[8]), tonumber(ARGV[9])
local sig, offmember, offtime = ARGV[11] or '', ARGV[12] or '', ARGV[13] or ''
local claim, now = ARGV[14] == '1', tonumber(ARGV[15] or '0')
local jails = {}
for name in string.gmatch(ARGV[10], '[^,]+') do jails[#jails + 1] = name end
local function clear(addr)  -- the address's score keys, one DEL for all its jails
  if #jails == 0 then return end
  local keys = {}
  for k, name in ipairs(jails) do keys[k] = P .. 's:' .. addr .. ':' .. name end
  redis.call('DEL', unpack(keys))
end
local function tomb_at(addr)  -- an unban's tombstone: "at|op|id|origin|sig" (older versions: "at")
  local v = redis.call('HGET', P .. 'unbans', addr)
  if not v then return -1 end
  return tonumber(string.match(v, '^[^|]*')) or -1
end
local function fields_of(v)
  local ok, b = pcall(cjson.decode, v)
  if ok and type(b) == 'table' then return tonumber(b.created) or 0, tostring(b.id or ''), b end
  return 0, '', nil
end
local function held_over(cur, c, bid)  -- does the current value `cur` win over a new ban (created `c`, id `bid`)?
  if not cur then return false end
  local oc, oid, ob = fields_of(cur)
  if claim and ob ~= nil then  -- a claim is refused while a ban is in force
    local e = tonumber(ob.expires)
    if e == nil or e > now then return true end
  end
  return oc > c or (oc == c and oid >= bid)
end
local function put_ban(addr, bid, json, member, at)  -- one ban into the shared set: true when it won
  local nb = cjson.decode(json)
  local c = tonumber(nb.created)
  if held_over(redis.call('HGET', P .. 'bans', addr), c, bid) then return false end
  if tomb_at(addr) >= c then return false end
  redis.call('HSET', P .. 'bans', addr, json)
  clear(addr)
  if nb.manual == false then
    if member == '' then member = bid end
    if at == '' then at = string.format('%.6f', c) end
    redis.call('ZADD', P .. 'off:' .. addr, at, member)
    redis.call('PEXPIRE', P .. 'off:' .. addr, math.ceil(memory * 1000))
  end
  return true
end
if op == 'ban' then
  if not put_ban(ip, id, payload, offmember, offtime) then return 0 end
  redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'ban', 'ip', ip, 'id', id,
             'origin', origin, 'ban', payload)
  return 1
end
if op == 'bans' then
  local skip, applied = {}, 0
  for k = 16, #ARGV - 4, 5 do
    if put_ban(ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3], ARGV[k + 4]) then
      applied = applied + 1
    else
      skip[#skip + 1] = tostring((k - 16) / 5 + 1)
    end
  end
  if applied > 0 then
    redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'bans', 'origin', origin, 'id', id,
               'bans', payload, 'sig', sig, 'skip', table.concat(skip, ','))
  end
  return applied
end
-- User bans (the office policy): op 'userban' / 'userunban', ARGV[16] the user's keyed hash, ARGV[17] its
-- text (an unban's); the shared user-ban hash P .. 'ubans' (field IP|HASH -> the signed json) and its
-- tombstones P .. 'uunbans' (field -> "at|id|origin|sig": a node that was away verifies it), never the address
-- ban set.
if op == 'userban' or op == 'userunban' then
  local uh, user = ARGV[16] or '', ARGV[17] or ''
  if not string.match(uh, '^%x+$') then return 0 end
  local field = ip .. '|' .. uh
  local cur = redis.call('HGET', P .. 'ubans', field)
  local tomb = tonumber(string.match(redis.call('HGET', P .. 'uunbans', field) or '', '^[^|]*')) or -1
  if op == 'userban' then
    local nb = cjson.decode(payload)
    local c = tonumber(nb.created)
    if held_over(cur, c, id) then return 0 end
    if tomb >= c then return 0 end
    redis.call('HSET', P .. 'ubans', field, payload)
    redis.call('DEL', P .. 's:' .. ip .. ':office_user:' .. uh)
    redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'userban', 'ip', ip, 'id', id,
               'origin', origin, 'ban', payload)
    return 1
  end
  if not redis.call('SET', P .. 'done:' .. id, '1', 'NX', 'PX', math.ceil(unban_memory * 1000)) then return 0 end
  local at = tonumber(payload)
  if cur then
    if fields_of(cur) > at then return 0 end
    redis.call('HDEL', P .. 'ubans', field)
  end
  if at > tomb then redis.call('HSET', P .. 'uunbans', field, payload .. '|' .. id .. '|' .. origin .. '|' .. sig) end
  redis.call('DEL', P .. 's:' .. ip .. ':office_user:' .. uh)
  redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'userunban', 'ip', ip, 'user', user,
             'id', id, 'origin', origin, 'at', payload, 'sig', sig)
  return 1
end
if not redis.call('SET', P .. 'done:' .. id, '1', 'NX', 'PX', math.ceil(unban_memory * 1000)) then return 0 end
local at = tonumber(payload)
local function unban(addr, cur)
  if cur then
    if fields_of(cur) > at then return end
    redis.call('HDEL', P .. 'bans', addr)
  end
  if at > tomb_at(addr) then
    redis.call('HSET', P .. 'unbans', addr, payload .. '|' .. op .. '|' .. id .. '|' .. origin .. '|' .. sig)
  end
  clear(addr)
end
if op == 'unban' then
  unban(ip, redis.call('HGET', P .. 'bans', ip))
elseif op == 'unban_all' then
  local all = redis.call('HGETALL', P .. 'bans')
  for k = 1, #all, 2 do unban(all[k], all[k + 1]) end
else
  return 0
end
redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', op, 'ip', ip, 'id', id,
           'origin', origin, 'at', payload, 'sig', sig)
return 1
