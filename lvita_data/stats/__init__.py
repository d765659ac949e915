"""`lvita stats`: packing statistics of a build: per-shard scans (`scan`), reject counts and
examples (`rejects`), the statistics (`compute`), the terminal report (`text`) and the HTML
report (`html`)."""
