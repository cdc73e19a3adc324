"""`malt export`: role datasets (SFT, DPO, JSON) from the stored trees."""
