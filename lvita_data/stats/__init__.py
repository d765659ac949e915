"""`lvita stats`: packing statistics of a build (`compute`) and the HTML report (`html`)."""
