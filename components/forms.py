"""What the forms that start a job share: the kinds of model source and of data source they offer, one list each,
so every tab names and orders them alike. Not a tab: train_form.py and rlhf_form.py (each form's way to a
RunConfig) and the tabs import these."""

MODEL_KINDS = ("Embedded", "Hub id", "Local folder")
SFT_DATA_KINDS = ("Bundled", "Hub dataset", "Uploaded file")
PREFERENCE_DATA_KINDS = ("Bundled pairs", "Collected feedback", "Uploaded file", "Hub dataset")
