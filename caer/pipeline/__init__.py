"""Recipes: what the commands run (extract, train, evaluate, demo), built on the library below them."""
