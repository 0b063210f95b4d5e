"""Mesh twin learning: similarity groups, fleet evidence, the competition, the twin simulator.

See ``docs/fleet.md``. Modules: :mod:`.groups` (fingerprints → similarity groups, overrides),
:mod:`.evidence` (the leaderboard of policies from the receiver's database), :mod:`.competition`
(the stratified, confident rule; combinations), :mod:`.twinsim` (the line physics run in the
cloud, calibrated per group), :mod:`.physics` (the physics itself), :mod:`.cli`, :mod:`.metrics`;
profiles, rollout and bootstrap live next to them. Importing this package imports nothing else.
"""
