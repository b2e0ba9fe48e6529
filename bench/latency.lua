-- wrk -s latency.lua: print the latency percentiles that `wrk --latency`
-- does not (p99.9), in microseconds, for bench/loads.py's parse_wrk. Only
-- done() is defined, so wrk's per-request path stays its static one.
done = function(summary, latency, requests)
  for _, p in ipairs({50, 99, 99.9}) do
    io.write(string.format("percentile-us %s %d\n", p, latency:percentile(p)))
  end
end
