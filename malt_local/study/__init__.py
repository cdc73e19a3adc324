"""`malt study`: train on one split, evaluate base and adapters on another, report."""
