"""Names shared by the judging modules and the tables that show their results (no imports)."""

NAME = "alpaca_eval"  # the judge option, conf/judge/alpaca_eval.yaml
LC_GLM = "alpaca_eval GLM length_controlled_v1 (AlpacaEval 2's LC win rate, 805 prompts)"
LC_ONE_MODEL = "ibridge one-model logistic fit (not AlpacaEval 2's LC win rate)"
