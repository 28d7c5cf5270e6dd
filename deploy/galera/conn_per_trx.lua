#!/usr/bin/env sysbench
-- Connection-per-transaction workload for sysbench 1.0.
--
-- Each event: connect, BEGIN, --point-selects point selects (optionally one
-- UPDATE with --write=on), COMMIT, disconnect. Tables are sysbench's own
-- (sbtest1..N, created by `sysbench oltp_read_only prepare`).
--
-- Failures are caught here, in Lua: a failed connect (sysbench's driver
-- prints "FATAL: unable to connect ..." to stderr, which is harmless) or a
-- failed statement ends the event, the connection is dropped, and the next
-- event connects afresh. Do not use --mysql-ignore-errors=all with this
-- script: Debian's sysbench 1.0.20 then reconnects inside its driver and
-- crashes on that reconnect.
--
-- sysbench's own tps counts every event, failed ones too. The real figures
-- are written by each thread to --progress-dir/thread-N.log, flushed about
-- once a second and at every failure (so a thread that hangs for good loses
-- at most the commits of its last second), as lines
--   S <bucket> <n>        n transactions committed in that bucket
--   F <bucket> <kind> <n> n failures of kind connect|trx in that bucket
--   M <kind>\t<text> <n> n failures of that kind with that error text since
--                        the last flush (connect failures only say
--                        "connection creation failed": the driver prints the
--                        MariaDB error to stderr)
--   L <bucket>            written at each flush: the thread is alive
-- where bucket = floor(CLOCK_REALTIME in ms / --bucket-ms). report.py reads
-- them (failed connects, failed transactions, longest stall, hang).
-- Without --progress-dir nothing is written.

ffi = require("ffi")
pcall(ffi.cdef, [[
struct cpt_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk_id, struct cpt_timespec *tp);
int usleep(unsigned int usec);
]])

sysbench.cmdline.options = {
   tables = {"Number of tables", 4},
   table_size = {"Number of rows per table", 10000},
   point_selects = {"Point selects per transaction", 2},
   write = {"Also UPDATE one row per transaction", false},
   progress_dir = {"Directory for per-thread progress files", ""},
   bucket_ms = {"Progress bucket width in milliseconds", 10},
   fail_sleep_ms = {"Pause after a failed connect or transaction (ms)", 10},
}

local ts = ffi.new("struct cpt_timespec")
local function now_ms()
   ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME: comparable with `date +%s%3N`
   return tonumber(ts.tv_sec) * 1000 + math.floor(tonumber(ts.tv_nsec) / 1e6)
end

local drv, out
local ok_buckets, fail_buckets, msgs = {}, {}, {}
local next_flush = 0
local bucket_ms, fail_sleep_us

local function flush(force)
   if out == nil then return end
   local t = now_ms()
   if not force and t < next_flush then return end
   next_flush = t + 1000
   for b, n in pairs(ok_buckets) do out:write("S ", b, " ", n, "\n") end
   for key, n in pairs(fail_buckets) do out:write("F ", key, " ", n, "\n") end
   for key, n in pairs(msgs) do out:write("M ", key, " ", n, "\n") end
   out:write("L ", math.floor(t / bucket_ms), "\n")
   out:flush()
   ok_buckets, fail_buckets, msgs = {}, {}, {}
end

local function failed(kind, err)
   local b = math.floor(now_ms() / bucket_ms)
   local key = b .. " " .. kind
   fail_buckets[key] = (fail_buckets[key] or 0) + 1
   local text = tostring(err):gsub("[\r\n\t]+", " "):sub(1, 200)
   local mkey = kind .. "\t" .. text
   msgs[mkey] = (msgs[mkey] or 0) + 1
   -- Written at once: a thread that blocks for good in its next connect
   -- (a hung balancer) must not take its failures with it.
   flush(true)
   if fail_sleep_us > 0 then ffi.C.usleep(fail_sleep_us) end
end

function thread_init()
   drv = sysbench.sql.driver()
   bucket_ms = sysbench.opt.bucket_ms
   fail_sleep_us = sysbench.opt.fail_sleep_ms * 1000
   if sysbench.opt.progress_dir ~= "" then
      out = assert(io.open(string.format("%s/thread-%d.log", sysbench.opt.progress_dir,
                                         sysbench.tid), "w"))
      out:write("L ", math.floor(now_ms() / bucket_ms), "\n")
      out:flush()
   end
end

function thread_done()
   flush(true)
   if out ~= nil then out:close() end
end

local function transaction(con)
   con:query("BEGIN")
   for i = 1, sysbench.opt.point_selects do
      con:query(string.format("SELECT c FROM sbtest%d WHERE id=%d",
                              sysbench.rand.uniform(1, sysbench.opt.tables),
                              sysbench.rand.uniform(1, sysbench.opt.table_size)))
   end
   if sysbench.opt.write then
      con:query(string.format("UPDATE sbtest%d SET k=k+1 WHERE id=%d",
                              sysbench.rand.uniform(1, sysbench.opt.tables),
                              sysbench.rand.uniform(1, sysbench.opt.table_size)))
   end
   con:query("COMMIT")
end

local function errtext(err)
   if type(err) == "table" then
      return string.format("errno %s: %s", tostring(err.sql_errno), tostring(err.sql_errmsg))
   end
   return tostring(err)
end

function event()
   local ok, con = pcall(drv.connect, drv)
   if not ok then
      failed("connect", errtext(con))
      flush(false)
      return
   end
   local ok2, err = pcall(transaction, con)
   pcall(con.disconnect, con)
   if ok2 then
      local b = math.floor(now_ms() / bucket_ms)
      ok_buckets[b] = (ok_buckets[b] or 0) + 1
   else
      failed("trx", errtext(err))
   end
   flush(false)
end
