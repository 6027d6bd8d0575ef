"""Evaluating models beyond the training loop: validation loss and perplexity of any run
(`loss`) and scoring instruction responses with an LLM judge (`judge`). Imports
`gptjax.runs` and everything below it; benchmark-harness backends land here too.
"""
