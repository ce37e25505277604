"""The Streamlit labeling page (app.py, run by `aae-ray label`)."""
