"""`lvita stats`: packing statistics of a build: per-shard scans (`scan`), the statistics
(`compute`), the terminal report (`text`) and the HTML report (`html`)."""
