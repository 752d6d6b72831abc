-- wrk script for profiling: post.lua's request, and the thread stops after N responses
-- (env N, default 20000), so a profile covers a fixed amount of work.
wrk.method = "POST"
wrk.body   = '{"prompt":"A beautiful sunset over mountains","model":"imagen-v2"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("WRK_AUTH") or "Bearer kg_team_alpha_secret_token_0001"
local limit = tonumber(os.getenv("N") or "20000")
local seen = 0
response = function(status, headers, body)
  seen = seen + 1
  if seen >= limit then wrk.thread:stop() end
end
