from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.courses.models import Chapter, ChapterProgress, ContentProblem, QuizAttempt
from apps.courses.services import content_sync, content_sync_if_changed
from tests.conftest import REPO
from tests.courses.factories import chapter_text, write_chapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    directory = tmp_path / "content"
    directory.mkdir()
    settings.CONTENT_DIR = directory
    write_chapter(directory, "01-one.md", slug="one", number=1)
    write_chapter(directory, "02-two.md", slug="two", number=2)
    return directory


def test_it_indexes_new_chapters(folder: Path) -> None:
    report = content_sync(content_dir=folder)
    assert (report.created, report.updated, report.retired) == (2, 0, 0)
    one = Chapter.objects.get(slug="one")
    assert one.number == 1 and one.source_path == "01-one.md"
    assert [q["id"] for q in one.quiz] == ["q1", "q2"]
    assert one.quiz[1]["multiple"] is True


def test_it_is_idempotent(folder: Path) -> None:
    content_sync(content_dir=folder)
    before = list(Chapter.objects.values_list("pk", "source_hash", "updated_at"))
    report = content_sync(content_dir=folder)
    assert (report.created, report.updated, report.unchanged) == (0, 0, 2)
    assert list(Chapter.objects.values_list("pk", "source_hash", "updated_at")) == before


def test_it_updates_an_edited_chapter(folder: Path) -> None:
    content_sync(content_dir=folder)
    write_chapter(folder, "01-one.md", slug="one", number=1, title="A new title")
    report = content_sync(content_dir=folder)
    assert report.updated == 1
    assert Chapter.objects.get(slug="one").title == "A new title"


def test_it_retires_a_removed_chapter_and_keeps_progress(folder: Path, learner) -> None:  # type: ignore[no-untyped-def]
    content_sync(content_dir=folder)
    two = Chapter.objects.get(slug="two")
    ChapterProgress.objects.create(user=learner, chapter=two)
    QuizAttempt.objects.create(user=learner, chapter=two, answers={}, score=1, max_score=2)

    (folder / "02-two.md").unlink()
    report = content_sync(content_dir=folder)

    assert report.retired == 1
    two.refresh_from_db()
    assert two.retired_at is not None
    assert ChapterProgress.objects.filter(user=learner, chapter=two).exists()
    assert QuizAttempt.objects.filter(user=learner, chapter=two).count() == 1

    # The file comes back: the chapter is live again with its progress.
    write_chapter(folder, "02-two.md", slug="two", number=2)
    content_sync(content_dir=folder)
    two.refresh_from_db()
    assert two.retired_at is None


def test_a_broken_chapter_keeps_its_last_good_version(folder: Path) -> None:
    content_sync(content_dir=folder)
    (folder / "01-one.md").write_text("---\nslug: one\nnumber: [oops\n---\n# One\n")
    report = content_sync(content_dir=folder)

    one = Chapter.objects.get(slug="one")
    assert one.retired_at is None
    assert one.title == "Chapter about one"
    assert "01-one.md:3:" in one.problem
    assert Chapter.objects.get(slug="two").problem == ""
    assert any(p.fatal for p in report.problems)
    assert ContentProblem.objects.filter(path="01-one.md", fatal=True).exists()

    # Fixing the file clears the problem.
    write_chapter(folder, "01-one.md", slug="one", number=1)
    content_sync(content_dir=folder)
    assert Chapter.objects.get(slug="one").problem == ""
    assert not ContentProblem.objects.exists()


def test_a_new_broken_file_does_not_stop_the_others(folder: Path) -> None:
    (folder / "03-three.md").write_text("no front matter here\n")
    report = content_sync(content_dir=folder)
    assert report.created == 2
    assert ContentProblem.objects.get(path="03-three.md").line == 1


def test_sync_if_changed_notices_edits(folder: Path) -> None:
    assert content_sync_if_changed(content_dir=folder) is True
    assert content_sync_if_changed(content_dir=folder) is False
    write_chapter(folder, "03-three.md", slug="three", number=3)
    assert content_sync_if_changed(content_dir=folder) is True
    assert Chapter.objects.filter(slug="three").exists()


def test_the_real_course_checks_clean(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("content", "check", "--dir", str(REPO / "content"))
    assert "12 chapters, no problems." in capsys.readouterr().out


def test_content_check_prints_file_line_message_and_fails(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "01-a.md").write_text(chapter_text(slug="a", number=1))
    (tmp_path / "02-b.md").write_text(chapter_text(slug="a", number=2))
    with pytest.raises(CommandError) as excinfo:
        call_command("content", "check", "--dir", str(tmp_path))
    assert excinfo.value.returncode == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{tmp_path / '01-a.md'}:2: ") for line in out), out
    assert any(line.startswith(f"{tmp_path / '02-b.md'}:2: ") for line in out), out


def test_content_sync_command_reports_counts(folder: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    call_command("content", "sync")
    assert "2 created" in capsys.readouterr().out
    call_command("content", "sync")
    assert "2 unchanged" in capsys.readouterr().out


def test_content_check_refuses_a_chapter_without_its_sandbox(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "01-a.md").write_text(chapter_text(slug="a", number=1))
    text = chapter_text(slug="b", number=2).replace("sandbox: replicated-lb", "sandbox: nowhere")
    (tmp_path / "02-b.md").write_text(text)
    with pytest.raises(CommandError):
        call_command("content", "check", "--dir", str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "01-a.md" in line] == []
    (problem,) = [line for line in out if "02-b.md" in line]
    assert problem.startswith(f"{tmp_path / '02-b.md'}:6: sandbox: no pattern named 'nowhere'")
    assert "every chapter launches a sandbox of its own" in problem
