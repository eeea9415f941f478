"""`judge=alpaca_eval`: AlpacaEval 2's pairwise judge through any OpenAI-compatible server (docs/design.md §3).

For each evaluation prompt a judge model compares the model's output with the fixed
reference output; the preference is read from the log-probabilities of the judge's one
answer token (``m`` / ``M``), and the two outputs' positions are randomised per prompt, as
alpaca_eval does. The pieces, one job each:

- :mod:`~ibridge.judging.settings`: the ``judge.*`` config, checked (one-line errors);
- :mod:`~ibridge.judging.annotator`: alpaca_eval's annotator config, prompt template,
  position randomisation and log-prob parser (the ``judge`` extra, imported lazily);
- :mod:`~ibridge.judging.client`: the openai client, the endpoint check, one request;
- :mod:`~ibridge.judging.cache`: judgments cached under ``$IBRIDGE_CACHE/judgments/``;
- :mod:`~ibridge.judging.runner`: bounded-concurrency judging that keeps what it finished;
- :mod:`~ibridge.judging.metrics`: win rate, standard error, length control, tokens, cost;
- :mod:`~ibridge.judging.stage`: the hooks the evaluation and the CLI call;
- :mod:`~ibridge.judging.alpaca_data`: ``eval_set=alpaca_eval`` (the 805 AlpacaEval prompts);
- :mod:`~ibridge.judging.toy_server`: an OpenAI-compatible server whose judge is the toy
  world's gold judge (tests, and trying the pipeline without a real judge).
"""
