from llm_jax.cli import main

main()
