"""Course staff's tools: the student handout, the grader, and the wrong solutions (mutants) the grader is tried on."""
