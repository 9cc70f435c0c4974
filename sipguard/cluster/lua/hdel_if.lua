-- Delete a hash field only if it still holds the value we looked at (GC of expired bans and
-- old unbans, so a ban written meanwhile by another node is never lost).
-- KEYS[1]: the hash; ARGV: field, expected value. Returns 1 when deleted, else 0.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
