"""Turning what a user gives into a job: the validation entry point (:mod:`.validate`) and
checkpoint resolution (:mod:`.resolve`: which model a checkpoint directory holds)."""
