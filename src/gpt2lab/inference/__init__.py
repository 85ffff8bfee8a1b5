"""Running a trained model: generation (`generate`), the KV cache (`kv_cache`), next-token
sampling (`sampling`), stop rules (`stopping`), attention masks (`masks`) and prompt rules
(`prompts`).

Generation, `Chat` (`gpt2lab.chat.session`) and the server's engine share these modules, so each
rule is written once. The package imports nothing itself: the masks, the cache, sampling, stop
rules and prompt rules sit at the base of the house (the model, the data loaders and the chat
format use them), `generate` is a library over a model.
"""
