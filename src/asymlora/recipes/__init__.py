"""Recipes: setup → train → evaluate → save, composed from the components (torchtune style)."""
