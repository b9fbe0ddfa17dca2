"""The pipeline's stages, one module each: attack (a BadNet to evaluate against), predeploy (Algorithm 1 ->
bundle v1), stream (Algorithm 2's deployment, offline), repair (purify -> learn the trigger -> fine-tune ->
gate -> bundle v+1), replay (a poisoned stream as frame files for agents)."""
