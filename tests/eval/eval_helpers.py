"""Fixtures shared by the eval tests (a module, not conftest.py: see tests/server/serving.py)."""


def write_csv_layout(root):
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    for subject in ("algebra", "world_history"):
        dev = "".join(f'"{subject} dev {i}",a,b,c,d,{"ABCD"[i % 4]}\n' for i in range(5))
        (root / "dev" / f"{subject}_dev.csv").write_text(dev)
    (root / "test" / "algebra_test.csv").write_text('"1+1?",1,2,3,4,B\n"2+2?",4,5,6,7,A\nbroken,row\n')
    (root / "test" / "world_history_test.csv").write_text('"Year?",1066,"1,2",3,4,A\n')
