-- Publishing one outbox entry (sipguard/cluster/bridge.py, ClusterBridge._flush): a ban wins only
-- over older ones (created, id) and over no later unban; unbans are deduplicated by id.
-- ARGV: prefix, stream maxlen, op ('ban' | 'unban' | 'unban_all'), ip, id, origin,
--       payload (the ban json, or the unban time), offence_memory, unban memory, jail names "a,b".
-- Returns 1 when applied (and appended to the stream), 0 when stale or a duplicate.
local P, maxlen, op, ip, id, origin, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local memory, unban_memory = tonumber(ARGV[8]), tonumber(ARGV[9])
local function clear(addr)
  for name in string.gmatch(ARGV[10], '[^,]+') do redis.call('DEL', P .. 's:' .. addr .. ':' .. name) end
end
local function created_of(v)
  local ok, b = pcall(cjson.decode, v)
  if ok and type(b) == 'table' then return tonumber(b.created) or 0, tostring(b.id or '') end
  return 0, ''
end
if op == 'ban' then
  local nb = cjson.decode(payload)
  local c = tonumber(nb.created)
  local cur = redis.call('HGET', P .. 'bans', ip)
  if cur then
    local oc, oid = created_of(cur)
    if oc > c or (oc == c and oid >= id) then return 0 end
  end
  local tomb = tonumber(redis.call('HGET', P .. 'unbans', ip) or '-1')
  if tomb >= c then return 0 end
  redis.call('HSET', P .. 'bans', ip, payload)
  clear(ip)
  if nb.manual == false then
    redis.call('ZADD', P .. 'off:' .. ip, string.format('%.6f', c), id)
    redis.call('PEXPIRE', P .. 'off:' .. ip, math.ceil(memory * 1000))
  end
  redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'ban', 'ip', ip, 'id', id,
             'origin', origin, 'ban', payload)
  return 1
end
if not redis.call('SET', P .. 'done:' .. id, '1', 'NX', 'PX', math.ceil(unban_memory * 1000)) then return 0 end
local at = tonumber(payload)
local function unban(addr, cur)
  if cur then
    if created_of(cur) > at then return end
    redis.call('HDEL', P .. 'bans', addr)
  end
  local tomb = tonumber(redis.call('HGET', P .. 'unbans', addr) or '-1')
  if at > tomb then redis.call('HSET', P .. 'unbans', addr, payload) end
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
           'origin', origin, 'at', payload)
return 1
