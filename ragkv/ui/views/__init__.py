"""Page scripts of the UI; each runs its ``main()`` when Streamlit executes it."""
