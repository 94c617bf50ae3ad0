-- Argo CD health of a Veil resource (ConfidentialModel, PrivacyBudget, SyntheticDataset).
-- Veil's status follows kstatus: Ready is always present once reconciled, Reconciling or
-- Stalled while they hold, observedGeneration says which spec the status describes.
--   Healthy      Ready True for the current generation
--   Progressing  not reconciled yet, generation ahead of observedGeneration, Reconciling,
--                or Ready False/Unknown for a reason that is not a failure
--   Degraded     Stalled True, or Ready False for a failure (a reason ending in Error,
--                Failed, Failure, Denied, Conflict, Unavailable, Unreadable, Invalid or
--                NotReady; also InvalidSpec), even while Veil retries it
-- Veil has no suspend: Suspended is never returned.
local hs = {}

local function describe(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return (condition.reason or "") .. ": " .. condition.message
  end
  return condition.reason or ""
end

local function is_failure(reason)
  if reason == nil then
    return false
  end
  for _, suffix in ipairs({"Error", "Failed", "Failure", "Denied", "Conflict", "Unavailable", "Unreadable", "Invalid", "NotReady"}) do
    if string.sub(reason, -string.len(suffix)) == suffix then
      return true
    end
  end
  return reason == "InvalidSpec"
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting: Veil is cleaning up"
  return hs
end

local status = obj.status or {}
local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end
local ready = conditions["Ready"]
local stalled = conditions["Stalled"]
local reconciling = conditions["Reconciling"]

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local generation = obj.metadata.generation
if status.observedGeneration == nil or ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Veil to reconcile"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Veil to reconcile generation " .. generation .. " (status is for " .. status.observedGeneration .. ")"
  return hs
end

if ready.status == "False" and is_failure(ready.reason) then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
hs.status = "Progressing"
hs.message = describe(ready)
return hs
