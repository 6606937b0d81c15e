name = "x"
a = f"hello {name}!"
b = rf'\d{{2}} {name!r:>{width}} ok'
c = f"""multi
line {a +
 b} end"""
d = f"{f'{name}'}" + F"X{1}"
e = f"{{}}"
